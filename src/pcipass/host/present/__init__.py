"""What the host verbs print and write: their command lines, JSON documents, consumer config."""
