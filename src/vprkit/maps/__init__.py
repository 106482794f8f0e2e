"""Building a place map from your own geotagged photos."""
