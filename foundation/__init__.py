"""What every package stands on: atomic storage and checksums, safe model loading and fingerprints,
dataset shard files, image decoding, input validation and the one backend seam. Imports nothing
of ours."""
