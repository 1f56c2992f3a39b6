"""Notifications to users about their bookings, sent by the background job runner."""
