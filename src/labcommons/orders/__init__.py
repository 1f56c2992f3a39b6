"""Service orders: testing, contract R&D and consultation, from request to rated delivery."""
