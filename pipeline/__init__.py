"""The offline side: dataset readers, the frames / teacher / points stages, the synthetic rooms, the
2D teachers and the viewer. It never imports the trainer."""
