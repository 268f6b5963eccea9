"""`legonet serve`: MLflow's scoring protocol over the registry alias it follows, with the version's quarantine."""
