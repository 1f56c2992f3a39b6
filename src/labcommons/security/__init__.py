"""Defences against hostile input: body size limits, write rate limits and security headers."""
