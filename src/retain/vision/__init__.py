"""Vision-language models in retain: pictures drawn by retain (``render``), visual tasks (``tasks``, registered in
``retain.tasks``), the embedded tiny VLM (``model``), its pretraining (``pretrain``) and rollouts with images
(``engine``)."""
