"""Developer tooling kept out of the runtime package: docs generation, the demo job, toy data."""
