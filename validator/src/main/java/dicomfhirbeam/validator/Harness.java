package dicomfhirbeam.validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.parser.IParser;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.UnknownCodeSystemWarningValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4.model.CodeSystem;
import org.hl7.fhir.r4.model.StructureDefinition;
import org.hl7.fhir.r4.model.ValueSet;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.PrintWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Validates FHIR R4 NDJSON files with HAPI FHIR's instance validator, offline.
 *
 * <p>The validation support chain: the R4 core definitions shipped in hapi-fhir-validation-resources-r4,
 * the conformance resources (StructureDefinitions, CodeSystems, ValueSets) of every {@code --profiles}
 * folder, snapshot generation for differential-only profiles, in-memory terminology (CodeSystems
 * and ValueSets given as files, no server) and the common code systems (UCUM, BCP-47, ISO 3166, MIME
 * types, ...). Nothing is fetched from a network.
 *
 * <pre>
 * java -cp 'target/classes:target/lib/*' dicomfhirbeam.validator.Harness \
 *     --profiles DIR [--profiles DIR2] --report issues.jsonl FILE.ndjson ...
 * </pre>
 *
 * <p>Every line of every file is one resource (a Bundle is validated with its entries). The report
 * gets one JSON object per issue ({@code file, line, resourceType, id, severity, messageId,
 * location, message}); stdout gets one summary JSON object with counts by severity and, for
 * warnings and errors, by message id. Exit code 0 when no resource has an error or fatal issue, 1
 * otherwise, 2 for bad arguments.
 */
public final class Harness {

	private Harness() {}

	public static void main(String[] args) throws IOException {
		List<Path> profileDirs = new ArrayList<>();
		List<Path> files = new ArrayList<>();
		Path report = null;
		for (int i = 0; i < args.length; i++) {
			switch (args[i]) {
				case "--profiles" -> profileDirs.add(Path.of(args[++i]));
				case "--report" -> report = Path.of(args[++i]);
				default -> files.add(Path.of(args[i]));
			}
		}
		if (files.isEmpty()) {
			System.err.println("usage: Harness --profiles DIR [--report FILE] FILE.ndjson ...");
			System.exit(2);
		}

		long started = System.nanoTime();
		FhirContext ctx = FhirContext.forR4Cached();
		PrePopulatedValidationSupport local = new PrePopulatedValidationSupport(ctx);
		int loaded = 0;
		for (Path dir : profileDirs) {
			loaded += loadConformanceResources(ctx, dir, local);
		}
		ValidationSupportChain chain = new ValidationSupportChain(
				new DefaultProfileValidationSupport(ctx),
				local,
				new SnapshotGeneratingValidationSupport(ctx),
				new ServerOnlyCodeSystems(ctx),
				new InMemoryTerminologyServerValidationSupport(ctx),
				new CommonCodeSystemsTerminologyService(ctx),
				unknownCodeSystemsWarn(ctx));
		FhirInstanceValidator module = new FhirInstanceValidator(chain);
		FhirValidator validator = ctx.newValidator().registerValidatorModule(module);
		IParser parser = ctx.newJsonParser();

		Map<String, Integer> bySeverity = new TreeMap<>();
		Map<String, Integer> byMessageId = new TreeMap<>();
		Map<String, Integer> byType = new TreeMap<>();
		int resources = 0;
		int resourcesWithErrors = 0;
		try (Writer out = report == null ? Writer.nullWriter() : Files.newBufferedWriter(report, StandardCharsets.UTF_8);
				PrintWriter reportOut = new PrintWriter(out)) {
			for (Path file : files) {
				try (BufferedReader reader = Files.newBufferedReader(file, StandardCharsets.UTF_8)) {
					String line;
					int number = 0;
					while ((line = reader.readLine()) != null) {
						number++;
						if (line.isBlank()) {
							continue;
						}
						resources++;
						IBaseResource resource = parser.parseResource(line);
						String type = ctx.getResourceType(resource);
						String id = resource.getIdElement().getIdPart();
						byType.merge(type, 1, Integer::sum);
						ValidationResult result = validator.validateWithResult(resource);
						boolean error = false;
						for (SingleValidationMessage message : result.getMessages()) {
							String severity = message.getSeverity().getCode();
							bySeverity.merge(severity, 1, Integer::sum);
							if (severity.equals("error") || severity.equals("fatal")) {
								error = true;
							}
							if (!severity.equals("information")) {
								byMessageId.merge(severity + " " + message.getMessageId(), 1, Integer::sum);
							}
							reportOut.println("{" + field("file", file.getFileName().toString()) + ","
									+ "\"line\":" + number + "," + field("resourceType", type) + "," + field("id", id)
									+ "," + field("severity", severity) + "," + field("messageId", message.getMessageId())
									+ "," + field("location", message.getLocationString()) + ","
									+ field("message", message.getMessage()) + "}");
						}
						if (error) {
							resourcesWithErrors++;
						}
					}
				}
			}
		}
		double seconds = (System.nanoTime() - started) / 1e9;
		StringBuilder summary = new StringBuilder("{");
		summary.append("\"conformance_resources\":").append(loaded).append(',');
		summary.append("\"files\":").append(files.size()).append(',');
		summary.append("\"resources\":").append(resources).append(',');
		summary.append("\"resources_with_errors\":").append(resourcesWithErrors).append(',');
		summary.append("\"by_type\":").append(object(byType)).append(',');
		summary.append("\"by_severity\":").append(object(bySeverity)).append(',');
		summary.append("\"by_message_id\":").append(object(byMessageId)).append(',');
		summary.append("\"seconds\":").append(String.format(java.util.Locale.ROOT, "%.2f", seconds)).append('}');
		System.out.println(summary);
		System.exit(resourcesWithErrors == 0 ? 0 : 1);
	}

	/**
	 * Code systems that only a terminology server holds (SNOMED CT, LOINC, DICOM DCM) cannot be
	 * checked offline: their codes give a warning instead of an error.
	 */
	private static UnknownCodeSystemWarningValidationSupport unknownCodeSystemsWarn(FhirContext ctx) {
		UnknownCodeSystemWarningValidationSupport support = new UnknownCodeSystemWarningValidationSupport(ctx);
		support.setNonExistentCodeSystemSeverity(ca.uhn.fhir.context.support.IValidationSupport.IssueSeverity.WARNING);
		return support;
	}

	/** Adds every StructureDefinition, CodeSystem and ValueSet of {@code dir} (other resources, e.g. examples, are left out). */
	private static int loadConformanceResources(FhirContext ctx, Path dir, PrePopulatedValidationSupport target)
			throws IOException {
		IParser parser = ctx.newJsonParser();
		int count = 0;
		List<Path> paths = new ArrayList<>();
		try (DirectoryStream<Path> stream = Files.newDirectoryStream(dir, "*.json")) {
			stream.forEach(paths::add);
		}
		paths.sort(null);
		for (Path path : paths) {
			IBaseResource resource = parser.parseResource(Files.readString(path, StandardCharsets.UTF_8));
			if (resource instanceof StructureDefinition sd) {
				target.addStructureDefinition(sd);
			} else if (resource instanceof CodeSystem cs) {
				target.addCodeSystem(cs);
			} else if (resource instanceof ValueSet vs) {
				target.addValueSet(vs);
			} else {
				continue;
			}
			count++;
		}
		return count;
	}

	private static String object(Map<String, Integer> counts) {
		StringBuilder out = new StringBuilder("{");
		counts.forEach((key, value) -> {
			if (out.length() > 1) {
				out.append(',');
			}
			out.append(quote(key)).append(':').append(value);
		});
		return out.append('}').toString();
	}

	private static String field(String name, String value) {
		return quote(name) + ":" + (value == null ? "null" : quote(value));
	}

	private static String quote(String value) {
		StringBuilder out = new StringBuilder("\"");
		for (char c : value.toCharArray()) {
			switch (c) {
				case '"' -> out.append("\\\"");
				case '\\' -> out.append("\\\\");
				case '\n' -> out.append("\\n");
				case '\r' -> out.append("\\r");
				case '\t' -> out.append("\\t");
				default -> {
					if (c < 0x20) {
						out.append(String.format("\\u%04x", (int) c));
					} else {
						out.append(c);
					}
				}
			}
		}
		return out.append('"').toString();
	}
}
