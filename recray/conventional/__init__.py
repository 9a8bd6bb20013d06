"""Recommenders that need no LLM: the reference rows every LLM model is read against
(Random, MostPop, SASRec; spec §4). Each scores every catalog item for a sample and goes
through the same ranking, prediction files and metric code as the LLM methods
(recray.evaluate.evaluate.score_items), so reports never learn which kind of model it was."""
