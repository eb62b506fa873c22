"""Images and hashes: downloaded bytes -> the stored JPEG, perceptual hashes, near-duplicates."""
