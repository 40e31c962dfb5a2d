"""The infrastructure both apps stand on: the chain (chain), IPFS (ipfs), processes and their
lifecycle (processes), the shared Flask plumbing (webapp), configuration (settings), plots
(plots) and atomic file writes (files). It imports processor/ and nothing above it.
"""
