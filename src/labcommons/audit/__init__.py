"""The audit log: every state change, appended with actor, time and before/after, in an HMAC hash chain."""
