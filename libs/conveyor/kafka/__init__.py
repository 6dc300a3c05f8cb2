"""Kafka client configuration, topic administration and the client protocols the runtime uses."""
