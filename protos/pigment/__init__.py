"""pigment: personalized image generation as a service."""
