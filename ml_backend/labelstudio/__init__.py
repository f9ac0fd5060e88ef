"""Label Studio adapter: config parsing (`config`), conversion of Detections to and from regions (`convert`), the
ML-backend server (`server`, `backend`), images fetched from Label Studio (`images`), whole-project and folder
pre-annotation (`annotate`), a project's tasks as neutral records (`records`), ranking tasks hardest first (`rank`),
Data Manager tabs of flagged tasks (`views`), the webhook event store (`store`) and the local Label Studio stack
(`stack`)."""
