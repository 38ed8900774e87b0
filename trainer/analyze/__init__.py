"""`trainer analyze`: mechanistic progress measures over a run's checkpoints (`measures`: induction and
previous-token scores, head ablations), their figures (`plots`) and the command (`cli`)."""
