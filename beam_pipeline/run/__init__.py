"""One run: options and settings, the Beam pipeline and its transforms, the output folder,
progress and summary, and ``convert`` (the same steps without Beam). The only wing that imports
``apache_beam``."""
