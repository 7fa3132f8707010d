"""Jinja2 templates of the status page (a package so that its data files ship in the wheel)."""
