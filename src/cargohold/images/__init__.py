"""Image graph handling: handler composition, platform filtering, dispatch, and the image model."""
