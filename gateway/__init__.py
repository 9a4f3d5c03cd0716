"""The OpenAI-compatible HTTP gateway: HTTP requests in, NATS jobs out, frames relayed back."""
