"""Reports rendered from a conformance run's JSON results."""
