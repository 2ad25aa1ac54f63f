"""Built-in recipes, shipped as package data (``surgery.recipes``). Extend them by name: ``extends: linear-probe``."""
