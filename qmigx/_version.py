"""The package version (one place: the package, QMP query-version and the build read it)."""

__version__ = "0.1.0"
