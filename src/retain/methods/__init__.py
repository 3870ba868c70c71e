"""Post-training methods: where the tokens come from × how each token is weighted × what pulls weights back."""
