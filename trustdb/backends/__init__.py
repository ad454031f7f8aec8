"""Kernel enforcement backends behind one interface (see interface.py)."""
