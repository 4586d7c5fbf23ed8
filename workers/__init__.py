"""Workers: claim requests from a model's stream, batch them in an engine, publish token events."""
