"""The gateway: an OpenAI-compatible FastAPI app in front of the request streams."""
