"""The shared catalogue: regions, institutions, facilities, instruments and services."""
