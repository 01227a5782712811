"""Service logic behind the routes, one small module per concern; routes stay thin."""
