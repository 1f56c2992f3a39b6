"""Users, API tokens and web sessions."""
