"""The shared core: the controller runtime every component builds on.

The core never imports a component (checked by import-linter, see
``.importlinter``).
"""
