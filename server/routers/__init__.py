"""One router per area of the API: health, models, inference (submit), requests (status, result, cancel, list,
downloads)."""
