"""grape-rewards."""
