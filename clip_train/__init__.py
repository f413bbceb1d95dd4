"""clip_train: CLIP training on caption-mixed data, composed from open_clip and caption_mixing."""
