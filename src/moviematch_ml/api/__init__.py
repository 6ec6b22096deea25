"""The HTTP layer: the app factory (composition root), routes, the fast path, error mapping and middleware."""
