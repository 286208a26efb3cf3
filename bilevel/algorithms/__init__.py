"""The methods, one module each, composed from the core; importing this package
registers them with `bilevel.runs.register`."""
