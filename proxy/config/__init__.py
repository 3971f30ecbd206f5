"""The config file: schema and validation, units, and the starter file `pyproxy init` writes."""
