"""LabCommons: a cross-region platform for sharing large research instruments and technical services."""

__version__ = "0.1.0"
