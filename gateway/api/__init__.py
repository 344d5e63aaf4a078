"""The HTTP edge: routes, handlers, problem+json errors."""
