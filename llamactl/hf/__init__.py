"""Models from the Hugging Face Hub: `hf:` references (refs), which files a reference means (select), and
fetching them into huggingface_hub's cache (pull)."""
