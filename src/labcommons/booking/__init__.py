"""Bookings of instrument time."""
