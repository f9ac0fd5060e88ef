"""Running batches somewhere other than the calling process (`ray_engine`: Ray Data actors), neutral: the adapter
hands over what each actor runs (e.g. the Label Studio adapter's `TaskPredictor`, which calls the engine)."""
