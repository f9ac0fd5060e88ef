"""Label Studio adapter: config parsing and which of its controls the server fills (`config`), conversion of
Detections to and from regions (`convert`), the ML-backend server (`server`, `backend`), images fetched from Label
Studio (`images`), whole-project and folder pre-annotation with failed tasks marked in Label Studio (`annotate`), a
project's tasks as neutral records (`records`), ranking tasks hardest first (`rank`), Data Manager tabs (`views`), the
webhook event store (`store`), the local Label Studio stack of `prelabel up` (`stack`) and how every command reaches
Label Studio: address and key from flags, the environment or a running `up`, and what a refused key means (`access`)."""
