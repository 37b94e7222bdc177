"""Front-ends: each translates one protocol into calls of the core's public API."""
