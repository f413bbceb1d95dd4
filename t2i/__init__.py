"""t2i: text-to-image (text-conditioned DiT) training on caption-mixed data; see issue 6."""
