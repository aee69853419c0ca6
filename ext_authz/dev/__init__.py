"""Local development tools: a demo issuer, an echo upstream and the local stack."""
