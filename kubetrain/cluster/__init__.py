"""Everything that talks to Kubernetes: compile, submit, render, Katib, Trainer TrainJobs."""
