"""Label Studio adapter: config parsing, conversion, the ML-backend server."""
