"""Ray Serve model tier: engines, the deployment that wraps them, and the router."""
