"""The HTTP layer of the service: FastAPI app, routes, error mapping and middleware."""
