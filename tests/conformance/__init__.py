"""A third party's view of the serving topic: code written from docs/ alone, run against the project's bytes."""
