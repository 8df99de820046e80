"""The package version, where the core (checkpoint metadata) can read it without importing the package."""

VERSION = "0.1.0"
